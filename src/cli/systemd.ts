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

/**
 * The listening socket systemd handed over (socket activation: LISTEN_PID is this process and
 * LISTEN_FDS at least 1; the first is fd 3), or undefined. The variables are removed, so that
 * nothing this process starts takes them for its own.
 */
export function activationSocket(env: NodeJS.ProcessEnv = process.env): number | undefined {
  if (env.LISTEN_PID === undefined || Number(env.LISTEN_PID) !== process.pid) return undefined;
  const count = Number(env.LISTEN_FDS ?? 0);
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  if (!(count >= 1)) return undefined;
  if (count > 1) throw new Error(`systemd handed over ${count} sockets (LISTEN_FDS); this command listens on one`);
  return 3;
}
