// A log for messages the other side can cause at will: a guest's malformed
// requests, a local user's reads of a broken tree. Without a limit one guest
// could write lines as fast as it can post requests, filling the host's
// journal and, since Node writes to a piped stderr synchronously, stalling the
// event loop every other guest is served from. Shared by both transports.

export interface LogLimit {
  /** Lines that may come at once (the bucket's size). Default 100. */
  burst?: number;
  /** Lines a second once the burst is spent (the bucket's refill). Default 10. */
  perSecond?: number;
  /** The clock, in ms (tests). */
  now?: () => number;
}

/**
 * Wraps `log` in a token bucket. A message over the limit is dropped and
 * counted; one line a second later says how many were, so a flood is still
 * visible in the log, at the limit's rate.
 */
export function limitLog(log: (message: string) => void, limit: LogLimit = {}): (message: string) => void {
  const burst = limit.burst ?? 100;
  const perSecond = limit.perSecond ?? 10;
  const now = limit.now ?? Date.now;
  let tokens = burst;
  let refilledAt = now();
  let dropped = 0;
  let reporting: NodeJS.Timeout | undefined;

  const report = () => {
    reporting = undefined;
    if (dropped === 0) return;
    log(`${dropped} more message${dropped === 1 ? '' : 's'} not logged (more than ${perSecond} a second)`);
    dropped = 0;
  };

  return (message: string) => {
    const at = now();
    tokens = Math.min(burst, tokens + ((at - refilledAt) / 1000) * perSecond);
    refilledAt = at;
    if (tokens >= 1) {
      tokens--;
      log(message);
      return;
    }
    dropped++;
    // unref: a pending count must not keep a process alive that is otherwise done.
    reporting ??= setTimeout(report, 1000).unref();
  };
}
