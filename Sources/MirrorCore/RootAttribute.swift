/// The extended attributes on a mount's root, by which the CLI (and a job setup looking for
/// an image's holder) finds the daemon behind a mount: one place for their wire names.
public enum RootAttribute {
    /// The QMP socket's path.
    public static let qmp = "user.mirrorfs.qmp"
    /// The serving daemon's pid.
    public static let pid = "user.mirrorfs.pid"
    /// The file or NBD export the image is served from now (the target after a pivot).
    public static let serving = "user.mirrorfs.serving"
    /// How many times the mount's server was replaced (SPEC 11): deaths and planned restarts.
    public static let restarts = "user.mirrorfs.restarts"
    /// The keeper's pid: the process that holds the connection and starts the servers.
    public static let keeper = "user.mirrorfs.keeper"
    /// The target of the job that runs, if any.
    public static let target = "user.mirrorfs.target"
}
