// Writing command output that may be large (a blob, a long listing) to
// stdout as it is produced, waiting for the reader instead of queueing it all.
/** Writes the chunks to stdout in turn, each once the reader took the ones before. */
export async function writeToStdout(chunks: AsyncIterable<Buffer> | Iterable<Buffer>): Promise<void> {
  const out = process.stdout;
  let failure: Error | undefined;
  const onError = (err: Error) => {
    failure ??= err;
  };
  out.on('error', onError);
  try {
    for await (const chunk of chunks) {
      if (failure) break;
      if (!out.write(chunk)) {
        await new Promise<void>((resolve) => {
          const done = () => {
            out.off('drain', done);
            out.off('error', done);
            resolve();
          };
          out.on('drain', done);
          out.on('error', done);
        });
      }
    }
    if (!failure) await new Promise<void>((resolve) => out.write('', () => resolve()));
  } finally {
    out.off('error', onError);
  }
  if (failure) {
    throw (failure as NodeJS.ErrnoException).code === 'EPIPE' ? new Error('the reader went away (broken pipe)') : failure;
  }
}
