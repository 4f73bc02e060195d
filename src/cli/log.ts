// What the serving commands say, for a person (text, as always) or a collector (--log-format json:
// one object a line, with stable fields: time, level, cmd, msg, and kind "access" for nar-bridge's
// request lines). --log-level drops what is below it: info (start, stop, connections, requests),
// warn (a request or a lookup that failed, a substituter that refused), error.
export type LogLevel = 'error' | 'warn' | 'info';
export type LogFormat = 'text' | 'json';
const RANK: Record<LogLevel, number> = { error: 0, warn: 1, info: 2 };

export interface Logger {
  info(message: string): void;
  warn(message: string): void;
  error(message: string): void;
  /** A request line (nar-bridge's combined log format). */
  access(line: string): void;
}

export interface LogOptions {
  logFormat?: string;
  logLevel?: string;
}

export function makeLogger(command: string, options: LogOptions = {}, write: (line: string) => void = (line) => process.stderr.write(`${line}\n`)): Logger {
  const format = (options.logFormat ?? process.env.NIXCAS_LOG_FORMAT ?? 'text') as LogFormat;
  const level = (options.logLevel ?? process.env.NIXCAS_LOG_LEVEL ?? 'info') as LogLevel;
  if (format !== 'text' && format !== 'json') throw new Error(`--log-format ${format}: text or json`);
  if (!(level in RANK)) throw new Error(`--log-level ${level}: error, warn or info`);
  const emit = (at: LogLevel, message: string, kind?: string) => {
    if (RANK[at] > RANK[level]) return;
    if (format === 'json') write(JSON.stringify({ time: new Date().toISOString(), level: at, cmd: command, ...(kind ? { kind } : {}), msg: message }));
    else write(kind === 'access' ? message : `nixcas ${command}: ${message}`);
  };
  return {
    info: (message) => emit('info', message),
    warn: (message) => emit('warn', message),
    error: (message) => emit('error', message),
    access: (line) => emit('info', line, 'access'),
  };
}
