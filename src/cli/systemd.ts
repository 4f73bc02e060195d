// systemd's readiness protocol (sd_notify): when started by a unit with Type=notify, NOTIFY_SOCKET
// names a datagram socket to send READY=1 to once the server listens, STATUS= lines, and
// STOPPING=1 when it shuts down. Without NOTIFY_SOCKET nothing is sent.
import { optionalNative } from '../native/index.js';

/** Sends `fields` (e.g. READY=1, STATUS=…) to NOTIFY_SOCKET, if there is one; a failure is reported once through `log`. */
export function notifySystemd(fields: Record<string, string>, log: (message: string) => void, env: NodeJS.ProcessEnv = process.env): void {
  const socket = env.NOTIFY_SOCKET;
  if (!socket) return;
  const message = Object.entries(fields).map(([key, value]) => `${key}=${value.replace(/\n/g, ' ')}`).join('\n');
  const addon = optionalNative();
  const result = addon ? addon.notifySocket(socket, message) : -1;
  if (result !== 0 && !warned) {
    warned = true;
    log(`could not tell systemd (NOTIFY_SOCKET=${socket}) we are ${fields.READY ? 'ready' : 'stopping'}: ${addon ? `errno ${-result}` : 'the native addon is missing'}`);
  }
}
let warned = false;

/** A socket systemd handed over: its descriptor and the unit's FileDescriptorName= for it (or ''). */
export interface HandedSocket {
  fd: number;
  name: string;
}

/**
 * The listening sockets systemd handed over (socket activation: LISTEN_PID is this process,
 * LISTEN_FDS of them from fd 3 on, LISTEN_FDNAMES their names, colon-separated). The variables
 * are removed, so that nothing this process starts takes them for its own.
 */
export function activationSockets(env: NodeJS.ProcessEnv = process.env): HandedSocket[] {
  if (env.LISTEN_PID === undefined || Number(env.LISTEN_PID) !== process.pid) return [];
  const count = Number(env.LISTEN_FDS ?? 0);
  const names = (env.LISTEN_FDNAMES ?? '').split(':');
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  if (!(count >= 1)) return [];
  // systemd passes a handful; a count beyond any fd limit is not from systemd.
  if (!Number.isInteger(count) || count > 4096) throw new Error(`LISTEN_FDS=${JSON.stringify(String(count))} is not a number of sockets systemd hands over`);
  return Array.from({ length: count }, (_, i) => ({ fd: 3 + i, name: names[i] ?? '' }));
}

/** The one listening socket a command that listens once was handed (fd 3), or undefined. */
export function activationSocket(env: NodeJS.ProcessEnv = process.env): number | undefined {
  const sockets = activationSockets(env);
  if (sockets.length > 1) throw new Error(`systemd handed over ${sockets.length} sockets (LISTEN_FDS); this command listens on one`);
  return sockets[0]?.fd;
}
