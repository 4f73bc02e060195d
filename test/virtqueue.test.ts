// The split virtqueue in-process, without a daemon: the scripted front end
// (vhost-user-frontend.ts) lays rings and chains out in memfd guest memory, and
// the back end's own GuestMemory maps the same memfds, as rust-vmm's
// virtio-queue tests do with their mock memory. Covered here: chains split at
// every byte across descriptors (direct and indirect), replies into writable
// parts of every size, the in-place (scatter) replies READ uses, chain objects
// reused per head, and when the device interrupts the driver or asks it not to
// kick. The tests against a running daemon are in vhost-user.test.ts.
import assert from 'node:assert/strict';
import { afterEach, beforeEach, describe, test } from 'node:test';
import { GuestMemory as DeviceMemory, type Places } from '../src/vhost-user/memory.js';
import { ChainError, type DescriptorChain, SplitQueue as DeviceQueue } from '../src/vhost-user/virtqueue.js';
import { closeEverything, defaultGuestMemory, GuestMemory as GuestMemoryClass, type GuestMemory, type Posted, type Segment, SplitQueue } from './vhost-user-frontend.js';
import { seededBytes } from './helpers.js';

const QUEUE_SIZE = 256;
const AVAIL_F_NO_INTERRUPT = 1;
const USED_F_NO_NOTIFY = 1;

/** Deterministic bytes (xorshift), so a failure names the exact input. */
const bytes = seededBytes;

interface Rig {
  guest: GuestMemory;
  driver: SplitQueue;
  memory: DeviceMemory;
  queue: DeviceQueue;
  interrupts: { count: number };
}

function rig(options: { indirect?: boolean; eventIdx?: boolean } = {}): Rig {
  const guest = defaultGuestMemory('nixcas-virtqueue-test');
  const driver = new SplitQueue(guest, 1, QUEUE_SIZE);
  const memory = new DeviceMemory(8);
  for (const r of guest.regions) memory.add({ guestPhysAddr: Number(r.gpa), size: r.size, userAddr: Number(r.userAddr), mmapOffset: r.mmapOffset }, r.fd);
  const interrupts = { count: 0 };
  const queue = new DeviceQueue(
    memory,
    { size: QUEUE_SIZE, desc: Number(driver.desc), avail: Number(driver.avail), used: Number(driver.used), nextAvail: 0, eventIdx: options.eventIdx ?? false, indirect: options.indirect ?? true },
    () => void interrupts.count++,
  );
  return { guest, driver, memory, queue, interrupts };
}

function free(r: Rig): void {
  r.queue.deactivate();
  r.memory.clear();
  r.driver.close();
  r.guest.free();
}

/** Posts a chain and takes it on the device side. */
function post(r: Rig, segments: Segment[], indirect = false): { posted: Posted; chain: DescriptorChain } {
  const posted = r.driver.build(segments, { indirect });
  r.driver.publish([posted.head]);
  const rejected: Error[] = [];
  const chain = r.queue.pop((err) => rejected.push(err));
  assert.deepEqual(rejected, [], 'the chain is taken');
  assert.ok(chain, 'a chain is available');
  assert.equal(chain.head, posted.head);
  return { posted, chain };
}

/** The used entry the device added for `posted`, and the bytes it wrote. */
function used(r: Rig, posted: Posted): Buffer {
  const entries = r.driver.collect();
  assert.equal(entries.length, 1, 'one used entry');
  assert.equal(entries[0].id, posted.head);
  r.driver.release(posted);
  return r.driver.written(posted, entries[0].len);
}

/** Splits `data` into readable segments at `cuts`. */
function pieces(data: Buffer, cuts: number[]): Segment[] {
  const out: Segment[] = [];
  let at = 0;
  for (const cut of [...cuts, data.length]) {
    out.push({ data: data.subarray(at, cut) });
    at = cut;
  }
  return out;
}

describe('split virtqueue (in-process)', () => {
  let r: Rig;
  beforeEach(() => {
    r = rig();
  });
  afterEach(() => {
    free(r);
    closeEverything();
  });

  for (const indirect of [false, true]) {
    test(`a request split at every byte across ${indirect ? 'an indirect table' : 'descriptors'} reads back whole`, () => {
      const request = bytes(80, 21);
      for (let cut = 1; cut < request.length; cut++) {
        for (const second of [undefined, Math.min(request.length - 1, cut + 7)]) {
          const cuts = second && second > cut ? [cut, second] : [cut];
          const { posted, chain } = post(r, [...pieces(request, cuts), { writable: 32 }], indirect);
          assert.ok(chain.read().equals(request), `split at ${cuts.join(', ')}: the request reads back`);
          assert.equal(chain.readableLength, request.length);
          assert.equal(chain.writableLength, 32);
          chain.reply(Buffer.from([cut]));
          assert.ok(used(r, posted).equals(Buffer.from([cut])));
        }
      }
      r.driver.checkGuards();
    });
  }

  test('replies of every size into writable parts split at every boundary: exact, and refused whole when one byte too long', () => {
    for (let first = 1; first <= 24; first++) {
      for (const second of [1, 9, 24]) {
        const room = first + second;
        for (let length = 0; length <= room + 1; length++) {
          const reply = bytes(length, 1000 * first + length + 1);
          const { posted, chain } = post(r, [{ data: bytes(40, 3) }, { writable: first }, { writable: second }], (first + length) % 2 === 0);
          if (length > room) {
            assert.throws(() => chain.reply(reply), ChainError, `a ${length}-byte reply does not fit ${first} + ${second}`);
            // Nothing was written: the parts still hold the front end's fill.
            for (const w of posted.writable) assert.ok(r.guest.read(w.gpa, w.len).every((b) => b === 0xa5), 'nothing written');
            chain.done(0);
            assert.equal(used(r, posted).length, 0);
          } else {
            chain.reply(reply);
            assert.ok(used(r, posted).equals(reply), `${length} bytes into ${first} + ${second}`);
          }
        }
      }
    }
    r.driver.checkGuards();
  });

  test('in-place replies: the places of the reply cover its bytes at every split, and the header is written last', () => {
    const header = bytes(16, 77);
    for (let split = 1; split <= 40; split++) {
      for (const first of [8, 16, 20])
      for (const indirect of [false, true]) {
        const parts = [first, split, 40 - split + 3, 4096];
        const { posted, chain } = post(r, [{ data: bytes(40, 5) }, ...parts.map((writable) => ({ writable }))], indirect);
        const data = bytes(split + 40, split);
        const places: Places = { buffers: [], spans: new Uint32Array(3 * 16), count: 0 };
        assert.ok(chain.writablePlaces(16, data.length, places), 'room for the data');
        let copied = 0;
        for (let i = 0; i < places.count; i++) {
          const [buffer, offset, length] = places.spans.subarray(3 * i, 3 * i + 3);
          places.buffers[buffer].set(data.subarray(copied, copied + length), offset);
          copied += length;
        }
        assert.equal(copied, data.length, 'the places add up to the length asked for');
        chain.replyInPlace(header, 16 + data.length);
        assert.ok(used(r, posted).equals(Buffer.concat([header, data])), `parts ${parts.join(' + ')}${indirect ? ', indirect' : ''}`);
      }
    }
    r.driver.checkGuards();
  });

  test('places beyond the writable part, or more pieces than fit, are refused', () => {
    const { posted, chain } = post(r, [{ data: bytes(40, 6) }, ...Array.from({ length: 8 }, () => ({ writable: 8 }))]);
    const places: Places = { buffers: [], spans: new Uint32Array(3 * 4), count: 0 };
    assert.equal(chain.writablePlaces(0, 65, { buffers: [], spans: new Uint32Array(3 * 64), count: 0 }), false, 'past the 64 writable bytes');
    assert.equal(chain.writablePlaces(0, 64, places), false, 'eight pieces do not fit a list of four');
    assert.equal(chain.writablePlaces(8, 32, places), true, 'four pieces do');
    chain.done(0);
    used(r, posted);
  });

  test('a head carries one chain object, reused with a new generation; a head posted again while in flight gets another', () => {
    const first = post(r, [{ data: bytes(40, 8) }, { writable: 16 }]);
    const generation = first.chain.generation;
    first.chain.reply(Buffer.alloc(16));
    assert.equal(r.driver.collect().length, 1);
    // The driver posts the same descriptors again once they came back.
    r.driver.publish([first.posted.head]);
    const again = r.queue.pop(() => assert.fail('not rejected'));
    assert.equal(again, first.chain, 'the same object for the same head');
    assert.equal(again.generation, generation + 1);
    assert.ok(again.read().equals(bytes(40, 8)));
    // A hostile driver publishes the head again before it was answered.
    r.driver.publish([first.posted.head]);
    const twice = r.queue.pop(() => assert.fail('not rejected'));
    assert.ok(twice && twice !== again, 'a fresh object for the second use');
    assert.ok(again.pending && twice.pending, 'both are answered on their own');
    again.reply(Buffer.alloc(1));
    twice.done(0);
    assert.equal(r.driver.collect().length, 2);
    r.driver.release(first.posted);
  });

  test('interrupts: an early one after 16 replies, one at the end of the turn, none while the driver reaps', async () => {
    const posts = Array.from({ length: 20 }, () => post(r, [{ data: bytes(40, 10) }, { writable: 16 }]));
    posts.forEach(({ chain }, i) => {
      chain.reply(Buffer.alloc(16));
      assert.equal(r.interrupts.count, i < 15 ? 0 : 1, `after ${i + 1} replies: an interrupt only from the 16th on`);
    });
    await Promise.resolve();
    assert.equal(r.interrupts.count, 2, 'the end of the turn interrupts for the last 4');
    for (const p of posts) r.driver.release(p.posted);
    r.driver.collect();

    // The driver reaping (VRING_AVAIL_F_NO_INTERRUPT) is not interrupted at all.
    r.guest.view(r.driver.avail, 2).writeUInt16LE(AVAIL_F_NO_INTERRUPT);
    const quiet = Array.from({ length: 20 }, () => post(r, [{ data: bytes(40, 11) }, { writable: 16 }]));
    for (const { chain } of quiet) chain.reply(Buffer.alloc(16));
    await Promise.resolve();
    assert.equal(r.interrupts.count, 2, 'no interrupt while the driver disabled them');
    r.guest.view(r.driver.avail, 2).writeUInt16LE(0);
  });

  test('VRING_USED_F_NO_NOTIFY while the device takes chains; enabling again reports chains that came meanwhile', () => {
    const flags = () => r.guest.view(r.driver.used, 2).readUInt16LE(0);
    r.queue.disableNotification();
    assert.equal(flags(), USED_F_NO_NOTIFY);
    assert.equal(r.queue.enableNotification(), false, 'nothing came');
    assert.equal(flags(), 0);
    r.queue.disableNotification();
    const posted = r.driver.build([{ data: bytes(40, 12) }, { writable: 16 }]);
    r.driver.publish([posted.head]);
    assert.equal(r.queue.enableNotification(), true, 'a chain came while kicks were off: take it');
    assert.equal(flags(), 0);
    const chain = r.queue.pop(() => assert.fail('not rejected'));
    chain!.done(0);
    used(r, posted);
  });

  test('a readable descriptor after a writable one is returned unused, and the queue goes on', () => {
    const rejected: Error[] = [];
    const bad = r.driver.build([{ writable: 16 }, { data: bytes(40, 13) }]);
    const good = r.driver.build([{ data: bytes(40, 14) }, { writable: 16 }]);
    r.driver.publish([bad.head, good.head]);
    const chain = r.queue.pop((err) => rejected.push(err));
    assert.equal(rejected.length, 1);
    assert.match(rejected[0].message, /readable descriptor after a writable one/);
    assert.equal(chain?.head, good.head, 'the next chain is taken');
    chain!.done(0);
    const entries = r.driver.collect();
    assert.deepEqual(entries.map((e) => [e.id, e.len]), [[bad.head, 0], [good.head, 0]]);
  });
});

test('with EVENT_IDX, interrupts follow used_event', async () => {
  const r = rig({ eventIdx: true });
  try {
    r.driver.autoUsedEvent = false;
    r.driver.setUsedEvent(2); // interrupt once the device has passed used index 2
    const posts = Array.from({ length: 5 }, () => post(r, [{ data: bytes(40, 15) }, { writable: 16 }]));
    posts[0].chain.done(0);
    posts[1].chain.done(0);
    await Promise.resolve();
    assert.equal(r.interrupts.count, 0, 'used.idx 2 has not passed used_event 2');
    posts[2].chain.done(0);
    await Promise.resolve();
    assert.equal(r.interrupts.count, 1, 'used.idx 3 passed it');
    posts[3].chain.done(0);
    posts[4].chain.done(0);
    await Promise.resolve();
    assert.equal(r.interrupts.count, 1, 'no more until the driver moves used_event');
  } finally {
    free(r);
    closeEverything();
  }
});

test('requests and replies that cross the 1 GiB boundary between two mappings of a region', () => {
  // One region of 1 GiB + 4 MiB: the back end maps it as two chunks, split at 1 GiB. The memfd is
  // sparse, and nothing here touches more than a few pages of it.
  const guest = new GuestMemoryClass([{ gpa: 0x10_0000n, size: 2 ** 30 + (4 << 20), userAddr: 0x7e00_0000_0000n }], 'nixcas-virtqueue-big');
  const driver = new SplitQueue(guest, 1, QUEUE_SIZE);
  const memory = new DeviceMemory(8);
  const r = guest.regions[0];
  memory.add({ guestPhysAddr: Number(r.gpa), size: r.size, userAddr: Number(r.userAddr), mmapOffset: r.mmapOffset }, r.fd);
  const queue = new DeviceQueue(memory, { size: QUEUE_SIZE, desc: Number(driver.desc), avail: Number(driver.avail), used: Number(driver.used), nextAvail: 0, eventIdx: false, indirect: true }, () => {});
  try {
    const boundary = r.gpa + BigInt(2 ** 30);
    const request = bytes(80, 31);
    const requestGpa = boundary - 40n;
    guest.write(requestGpa, request);
    const replyGpa = boundary - 50n;
    const placesGpa = boundary + (1n << 20n) - 30n; // just before the end of the first mapping's 1 MiB overlap: from the second one
    const d = (i: number, addr: bigint, len: number, flags: number, next: number) => driver.writeDescriptor(driver.desc, i, { addr, len, flags, next });
    d(0, requestGpa, 80, 1, 1);
    d(1, replyGpa, 100, 2 | 1, 2);
    d(2, placesGpa, 60, 2, 0);
    driver.publish([0]);
    const chain = queue.pop(() => assert.fail('not rejected'))!;
    assert.ok(chain.read().equals(request), 'the request reads back across the boundary');
    const places: Places = { buffers: [], spans: new Uint32Array(3 * 8), count: 0 };
    assert.ok(chain.writablePlaces(100, 60, places));
    const data = bytes(60, 32);
    let copied = 0;
    for (let i = 0; i < places.count; i++) {
      const [buffer, offset, length] = places.spans.subarray(3 * i, 3 * i + 3);
      places.buffers[buffer].set(data.subarray(copied, copied + length), offset);
      copied += length;
    }
    assert.equal(copied, 60);
    const header = bytes(100, 33);
    chain.replyInPlace(header, 160);
    assert.ok(guest.read(replyGpa, 100).equals(header), 'the first part, across the 1 GiB boundary');
    assert.ok(guest.read(placesGpa, 60).equals(data), 'the second part, in place');
    assert.deepEqual(driver.collect(), [{ id: 0, len: 160 }]);
  } finally {
    queue.deactivate();
    memory.clear();
    driver.close();
    guest.free();
    closeEverything();
  }
});
