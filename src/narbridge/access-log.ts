// One line per request in the combined log format that nginx and Apache
// write, with the time taken appended in seconds (nginx's $request_time), so
// the usual log tools read it.
import type { IncomingMessage } from 'node:http';

const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];
const two = (n: number) => String(n).padStart(2, '0');

/** [21/Nov/2026:09:15:02 +0000] */
function timestamp(date: Date): string {
  return `${two(date.getUTCDate())}/${MONTHS[date.getUTCMonth()]}/${date.getUTCFullYear()}:${two(date.getUTCHours())}:${two(date.getUTCMinutes())}:${two(date.getUTCSeconds())} +0000`;
}

/** Quotes a request-supplied value so it cannot break the line or the quoting. */
function quoted(text: string | undefined): string {
  if (!text) return '"-"';
  return `"${text.slice(0, 1024).replace(/[\\"]/g, (c) => `\\${c}`).replace(/[\x00-\x1f\x7f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`)}"`;
}

export interface LoggedRequest {
  request: IncomingMessage;
  /** Taken when the request arrives: by the time the line is written the socket may be gone. */
  remoteAddress?: string;
  user?: string;
  status: number;
  bodyBytes: number;
  startedAt: bigint;
  /** The response did not complete (the client went away, or an error cut the body short). */
  incomplete: boolean;
}

export function formatAccessLine(entry: LoggedRequest, now = new Date()): string {
  const { request } = entry;
  const seconds = Number(process.hrtime.bigint() - entry.startedAt) / 1e9;
  const requestLine = `${request.method} ${request.url} HTTP/${request.httpVersion}`;
  return [
    entry.remoteAddress ?? '-',
    '-',
    entry.user ? quoted(entry.user).slice(1, -1).replace(/ /g, '_') : '-',
    `[${timestamp(now)}]`,
    quoted(requestLine),
    String(entry.status),
    String(entry.bodyBytes),
    quoted(request.headers.referer),
    quoted(request.headers['user-agent']),
    seconds.toFixed(3) + (entry.incomplete ? ' incomplete' : ''),
  ].join(' ');
}
