"""The run folder: everything a run keeps on disk, and the guarantees about it (docs/checkpoints.md).

    files     whole-or-absent files: fsync, write-then-rename, sha256
    commit    checkpoints: the commit protocol, the manifest, discovery, verification
    status    RUN/status.json and the run folder's lock
    signals   SIGTERM / SIGUSR1 as a flag read at the next step boundary
    guard     the non-finite policy: skipped steps, never a non-finite adapter
    folder    output.dir's checks, before anything is read or written
    session   one run's life in its folder, in order (read-only checks, open, attach, save, finish, close)
    summary   summary.json
    faults    the tests' fault hooks, off the production path
"""
