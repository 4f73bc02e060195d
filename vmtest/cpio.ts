// A writer for the cpio "newc" format, the only format the kernel unpacks as an initramfs.
//
// Written here rather than shelling out to `cpio -o -H newc` because:
//  - it needs no extra package and no staging directory on the host;
//  - every entry is owned by root (uid/gid 0) and has mtime 0, whatever user builds it,
//    so the archive is a pure function of its contents (good for content-hash caching);
//  - it can create device nodes (/dev/console) without root privileges or mknod.
//
// Format (see the kernel's Documentation/driver-api/early-userspace/buffer-format.rst):
// each entry is a 110-byte ASCII header "070701" + 13 fields of 8 hex digits, then the
// NUL-terminated name padded to a multiple of 4, then the data padded to a multiple of 4.
// The archive ends with an entry named "TRAILER!!!".

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;

interface Entry {
  name: string;
  mode: number;
  data: Buffer;
  rdevMajor?: number;
  rdevMinor?: number;
}

export class CpioWriter {
  private readonly chunks: Buffer[] = [];
  private readonly dirs = new Set<string>(['']);
  private nextIno = 1;

  /** A directory; parents are created as needed. */
  dir(path: string, mode = 0o755): this {
    const name = normalize(path);
    if (this.dirs.has(name)) return this;
    this.parents(name);
    this.dirs.add(name);
    return this.entry({ name, mode: S_IFDIR | mode, data: Buffer.alloc(0) });
  }

  file(path: string, data: Buffer | string, mode = 0o644): this {
    const name = normalize(path);
    this.parents(name);
    return this.entry({ name, mode: S_IFREG | mode, data: Buffer.from(data) });
  }

  symlink(path: string, target: string): this {
    const name = normalize(path);
    this.parents(name);
    return this.entry({ name, mode: S_IFLNK | 0o777, data: Buffer.from(target) });
  }

  charDevice(path: string, major: number, minor: number, mode = 0o600): this {
    const name = normalize(path);
    this.parents(name);
    return this.entry({ name, mode: S_IFCHR | mode, data: Buffer.alloc(0), rdevMajor: major, rdevMinor: minor });
  }

  /** The finished archive, trailer included. The writer must not be used afterwards. */
  finish(): Buffer {
    this.entry({ name: 'TRAILER!!!', mode: 0, data: Buffer.alloc(0) });
    return Buffer.concat(this.chunks);
  }

  // The kernel does not create missing parent directories, so emit them first.
  private parents(name: string): void {
    const slash = name.lastIndexOf('/');
    if (slash > 0) this.dir(name.slice(0, slash));
  }

  private entry(e: Entry): this {
    const nameBytes = Buffer.from(e.name + '\0');
    const fields = [
      this.nextIno++, // ino: unique per entry so nothing is mistaken for a hard link
      e.mode,
      0, // uid
      0, // gid
      (e.mode & 0o170000) === S_IFDIR ? 2 : 1, // nlink
      0, // mtime
      e.data.length,
      0, // devmajor
      0, // devminor
      e.rdevMajor ?? 0,
      e.rdevMinor ?? 0,
      nameBytes.length,
      0, // check (only used by the "070702" crc variant)
    ];
    const header = '070701' + fields.map((n) => n.toString(16).padStart(8, '0')).join('');
    this.chunks.push(Buffer.from(header, 'ascii'), nameBytes, padding(110 + nameBytes.length));
    this.chunks.push(e.data, padding(e.data.length));
    return this;
  }
}

function padding(length: number): Buffer {
  return Buffer.alloc((4 - (length % 4)) % 4);
}

// Archive names are relative ("bin/busybox"), without a leading "/" or "./".
function normalize(path: string): string {
  const name = path.replace(/^\/+/, '').replace(/\/+$/, '');
  if (name === '' || name.split('/').some((part) => part === '' || part === '.' || part === '..')) {
    throw new Error(`bad initramfs path: ${JSON.stringify(path)}`);
  }
  return name;
}
