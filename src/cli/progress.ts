// Progress on stderr when it is a terminal: one line, redrawn at most every 100 ms, with the time
// taken so far; Ctrl-C while it shows ends the line with what was done, instead of cutting it off.
export class Progress {
  /** Whether stderr is a terminal (and not CI): progress, and summaries meant for a person, are shown. */
  readonly enabled: boolean;
  private last = 0;
  private shown = false;
  private text = '';
  private readonly started = Date.now();
  private readonly onInterrupt = () => {
    if (this.shown) this.stream.write(`\r\x1b[K${this.text}: interrupted after ${this.elapsed()}\n`);
    this.shown = false;
    process.exit(130);
  };

  constructor(stream: NodeJS.WriteStream = process.stderr) {
    this.enabled = Boolean(stream.isTTY) && !process.env.CI;
    this.stream = stream;
  }

  private readonly stream: NodeJS.WriteStream;

  update(line: string | (() => string), force = false): void {
    if (!this.enabled) return;
    const now = Date.now();
    if (!force && now - this.last < 100) return;
    this.last = now;
    this.text = typeof line === 'function' ? line() : line;
    const shown = `${this.text} (${this.elapsed()})`;
    this.stream.write(`\r\x1b[K${shown.slice(0, (this.stream.columns || 80) - 1)}`);
    if (!this.shown) process.once('SIGINT', this.onInterrupt);
    this.shown = true;
  }

  /** Time since the work began, as `12.3 s` or `4 min 05 s`. */
  elapsed(): string {
    const seconds = (Date.now() - this.started) / 1000;
    return seconds < 60 ? `${seconds.toFixed(1)} s` : `${Math.floor(seconds / 60)} min ${String(Math.floor(seconds % 60)).padStart(2, '0')} s`;
  }

  /** `bytes` over the time since the work began, as `12.3 MiB/s`. */
  rate(bytes: number): string {
    const seconds = Math.max((Date.now() - this.started) / 1000, 0.001);
    return `${formatBytes(bytes / seconds)}/s`;
  }

  /** Clears the progress line so that ordinary output can follow. */
  clear(): void {
    if (this.shown) {
      this.stream.write('\r\x1b[K');
      process.off('SIGINT', this.onInterrupt);
    }
    this.shown = false;
  }
}

export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}
