// Message framing on a vhost-user socket: a 12-byte header (request, flags,
// payload size) and the payload, with file descriptors (SCM_RIGHTS) riding on
// the header's bytes. Reads never block the event loop.
import { closeSync } from 'node:fs';
import { constants } from 'node:os';
import { native, type Watch } from '../native/index.js';
import { FLAG_REPLY, HEADER_SIZE, MAX_PAYLOAD, VERSION } from './protocol.js';

export interface Message {
  request: number;
  flags: number;
  payload: Buffer;
  /** Received with the message; whoever handles the message owns (and must close) them. */
  fds: number[];
}

export interface ChannelEvents {
  message(message: Message): void;
  /** The peer went away or broke the framing; the channel is closed. */
  closed(reason: string): void;
}

export class MessageChannel {
  private readonly header = Buffer.alloc(HEADER_SIZE);
  private headerFilled = 0;
  private payload?: Buffer;
  private payloadFilled = 0;
  private fds: number[] = [];
  private watch?: Watch;
  private open = true;

  constructor(
    private readonly fd: number,
    private readonly events: ChannelEvents,
  ) {
    this.watch = native().watch(fd, () => this.drain());
  }

  /** Sends a reply to `request` with `payload` (flags: version 1 and REPLY, which is all QEMU accepts). */
  reply(request: number, payload: Buffer): void {
    if (!this.open) return;
    const header = Buffer.alloc(HEADER_SIZE);
    header.writeUInt32LE(request, 0);
    header.writeUInt32LE(VERSION | FLAG_REPLY, 4);
    header.writeUInt32LE(payload.length, 8);
    const n = native().writev(this.fd, payload.length > 0 ? [header, payload] : [header]);
    // The front end waits for each reply before its next message, so the socket buffer never fills.
    if (n !== HEADER_SIZE + payload.length) this.close(n < 0 ? `writing a reply failed: errno ${-n}` : 'a reply was cut short');
  }

  close(reason: string): void {
    if (!this.open) return;
    this.open = false;
    if (this.watch) native().unwatch(this.watch);
    closeAll(this.fds);
    this.fds = [];
    closeSync(this.fd);
    this.events.closed(reason);
  }

  private drain(): void {
    while (this.open) {
      const target = this.payload ? this.payload.subarray(this.payloadFilled) : this.header.subarray(this.headerFilled);
      const [n, ...fds] = native().recvmsg(this.fd, target);
      this.fds.push(...fds);
      if (n === -constants.errno.EAGAIN) return;
      if (n === -constants.errno.EMSGSIZE) return this.close('a message carried more file descriptors than allowed');
      if (n < 0) return this.close(`reading failed: errno ${-n}`);
      if (n === 0) return this.close(this.headerFilled > 0 || this.payload ? 'the front end hung up mid-message' : 'the front end hung up');
      if (this.payload) {
        this.payloadFilled += n;
        if (this.payloadFilled === this.payload.length) this.deliver();
        continue;
      }
      this.headerFilled += n;
      if (this.headerFilled < HEADER_SIZE) continue;
      const size = this.header.readUInt32LE(8);
      if (size > MAX_PAYLOAD) return this.close(`a message with a ${size}-byte payload (at most ${MAX_PAYLOAD})`);
      this.payload = Buffer.alloc(size);
      this.payloadFilled = 0;
      if (size === 0) this.deliver();
    }
  }

  private deliver(): void {
    const message: Message = {
      request: this.header.readUInt32LE(0),
      flags: this.header.readUInt32LE(4),
      payload: this.payload!,
      fds: this.fds,
    };
    this.headerFilled = 0;
    this.payload = undefined;
    this.fds = [];
    this.events.message(message);
  }
}

export function closeAll(fds: Iterable<number>): void {
  for (const fd of fds) {
    try {
      closeSync(fd);
    } catch {
      // already closed
    }
  }
}
