import Glibc

// Descriptors 0–2 are always open before anything else is: a daemon started with one of
// them closed would otherwise get the source image as "stderr" and log into the disk.
for fd in Int32(0)...2 where fcntl(fd, F_GETFD) < 0 {
    let null = open("/dev/null", O_RDWR)
    if null >= 0 && null != fd { dup2(null, fd); close(null) }
}
// Entry point: errors print as one line (SPEC section 6), never with the usage text.
Mirrorfs.runReportingOneLineErrors()
