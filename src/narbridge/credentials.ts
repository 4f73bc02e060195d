// Who may upload: HTTP Basic credentials (what Nix sends from its netrc-file),
// checked against a file of `user:password` lines.
import { createHash, timingSafeEqual } from 'node:crypto';
import { readFileSync, statSync } from 'node:fs';

export class Credentials {
  /** SHA-256 of "user:password", so every comparison is of equal length and constant time. */
  private readonly accepted: Buffer[];

  private constructor(pairs: string[]) {
    this.accepted = pairs.map((pair) => createHash('sha256').update(pair).digest());
  }

  /** Reads `user:password` lines; blank lines and lines starting with # are skipped. */
  static load(file: string): { credentials: Credentials; warning?: string } {
    const pairs: string[] = [];
    for (const [index, raw] of readFileSync(file, 'utf8').split('\n').entries()) {
      const line = raw.trim();
      if (line === '' || line.startsWith('#')) continue;
      const colon = line.indexOf(':');
      if (colon <= 0 || colon === line.length - 1) throw new Error(`${file}:${index + 1}: expected user:password`);
      pairs.push(line);
    }
    if (pairs.length === 0) throw new Error(`${file} has no user:password lines`);
    const mode = statSync(file).mode;
    const warning = mode & 0o077 ? `${file} is readable by other users (mode ${(mode & 0o777).toString(8)}); chmod 600 it` : undefined;
    return { credentials: new Credentials(pairs), warning };
  }

  /** The user named by a valid `Authorization: Basic …` header, or undefined. */
  check(authorization: string | undefined): string | undefined {
    const match = /^Basic\s+([A-Za-z0-9+/=]+)\s*$/i.exec(authorization ?? '');
    if (!match) return undefined;
    const pair = Buffer.from(match[1]!, 'base64').toString('utf8');
    const digest = createHash('sha256').update(pair).digest();
    let valid = false;
    for (const accepted of this.accepted) valid = timingSafeEqual(digest, accepted) || valid;
    return valid ? pair.slice(0, pair.indexOf(':')) : undefined;
  }
}
