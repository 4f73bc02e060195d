// One way to say what went wrong, for every command: a system call's failure
// as a sentence naming the file and what to do, a gRPC failure as "cannot
// reach the store at ADDR" without the library's own wording.

/** What an errno means for someone who ran a command, and what they can do about it. */
const ERRNO_SENTENCES: Record<string, string> = {
  ENOENT: 'no such file or directory',
  ENOTDIR: 'a part of the path is not a directory',
  EISDIR: 'is a directory',
  EACCES: 'permission denied (check the permissions of the file and of the directories above it)',
  EPERM: 'operation not permitted (does this need root?)',
  EEXIST: 'already exists',
  ENOSPC: 'no space left on the device (free some, or run `nixcas gc`)',
  EDQUOT: 'disk quota exceeded',
  EROFS: 'read-only file system',
  ENAMETOOLONG: 'name too long',
  ELOOP: 'too many levels of symbolic links',
  EMFILE: 'too many open files (raise the limit with `ulimit -n`)',
  EADDRINUSE: 'address already in use (is another server listening there?)',
  ECONNREFUSED: 'connection refused (is the server running?)',
  ENOTSOCK: 'not a socket',
};

interface SystemError extends Error {
  code?: string;
  syscall?: string;
  path?: string;
  dest?: string;
  address?: string;
  port?: number;
}

/** The message to print for `err`, without the `nixcas …:` prefix. */
export function describeError(err: unknown): string {
  if (!(err instanceof Error)) return String(err);
  const e = err as SystemError;
  const sentence = e.code ? ERRNO_SENTENCES[e.code] : undefined;
  // Node's own wording is `ENOENT: no such file or directory, lstat '/x'`: said once, plainly.
  if (sentence && e.syscall && e.message.startsWith(`${e.code}:`)) {
    const where = e.path ?? (e.address ? `${e.address}${e.port ? `:${e.port}` : ''}` : undefined);
    return where ? `${where}${e.dest ? ` -> ${e.dest}` : ''}: ${sentence}` : `${e.syscall}: ${sentence}`;
  }
  return grpcListenError(e.message) ?? e.message;
}

/**
 * grpc-js reports a failed bind as `No address added out of total 1 resolved errors:
 * [listen EACCES: permission denied /x/sock]`: the inner error is what to say.
 */
function grpcListenError(message: string): string | undefined {
  const match = /^No address added out of total \d+ resolved(?: errors: \[(.*)\])?/s.exec(message);
  if (!match) return undefined;
  const inner = /^listen (E[A-Z]+): [^/]*?(\S+)$/.exec(match[1] ?? '');
  if (!inner) return `cannot listen there${match[1] ? `: ${match[1]}` : ''}`;
  const [, code, where] = inner;
  const why = code === 'EACCES' || code === 'ENOENT' ? 'its directory is missing or not writable by this user' : (ERRNO_SENTENCES[code!] ?? code);
  return `cannot listen on ${where}: ${why}`;
}


/** `subject: why`, unless the description already starts by naming the subject. */
export function describeAbout(subject: string, err: unknown): string {
  const text = describeError(err);
  return text.startsWith(`${subject}:`) || text.startsWith(`${subject} `) ? text : `${subject}: ${text}`;
}
