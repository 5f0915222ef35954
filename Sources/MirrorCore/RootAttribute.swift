/// The extended attributes on a mount's root, by which the CLI (and a job setup looking for
/// an image's holder) finds the daemon behind a mount: one place for their wire names.
public enum RootAttribute {
    /// The QMP socket's path.
    public static let qmp = "user.mirrorfs.qmp"
    /// The serving daemon's pid.
    public static let pid = "user.mirrorfs.pid"
    /// The file or NBD export the image is served from now (the target after a pivot).
    public static let serving = "user.mirrorfs.serving"
    /// The target of the job that runs, if any.
    public static let target = "user.mirrorfs.target"
}
