// Progress on stderr when it is a terminal: one line, redrawn at most every 100 ms.
export class Progress {
  private readonly enabled: boolean;
  private last = 0;
  private shown = false;

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
    const text = typeof line === 'function' ? line() : line;
    this.stream.write(`\r\x1b[K${text.slice(0, (this.stream.columns || 80) - 1)}`);
    this.shown = true;
  }

  /** Clears the progress line so that ordinary output can follow. */
  clear(): void {
    if (this.shown) this.stream.write('\r\x1b[K');
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
