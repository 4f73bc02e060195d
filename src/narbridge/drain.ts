// Waiting for a writable stream to take more, without leaving listeners behind.
import { once } from 'node:events';
import type { Writable } from 'node:stream';

/** Until `stream` drains or closes; both listeners are removed either way. */
export async function drainedOrClosed(stream: Writable): Promise<void> {
  const cancel = new AbortController();
  try {
    await Promise.race([once(stream, 'drain', { signal: cancel.signal }), once(stream, 'close', { signal: cancel.signal })]);
  } finally {
    cancel.abort();
  }
}
