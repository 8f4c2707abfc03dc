"""The ground floor every path reads through, and that reads nothing above it.

Owns the user-error types and the one-line error policy (``errors``), reading untrusted files and
printable file names (``files``), writing every file whole and claiming run folders (``writing``),
decoding images from bytes (``images``), the dataset's class and target names (``labels``),
turning pydantic's refusals into one line (``validation``), Hydra's config folder, resolvers and
run-folder callback (``config``), what the CPU is fast at (``hardware``), per-image scores
(``metrics``), overlays (``visualize``), the files a run leaves (``run_files``) and the framework
messages a user cannot act on (``framework_noise``).

Imports from: nothing of covidseg's but itself.
"""
