// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "mirrorfs",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "mirrorfs", targets: ["mirrorfs"]),
        .executable(name: "mirrorfs-keeper", targets: ["mirrorfs-keeper"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
    ],
    targets: [
        // libfuse3's low-level API; shim.h wraps what libfuse exposes only as version macros.
        .systemLibrary(
            name: "CFuse",
            path: "CFuse",
            pkgConfig: "fuse3",
            providers: [.apt(["libfuse3-dev"])]
        ),
        // Linux file APIs that Glibc's module leaves out (O_DIRECT, fallocate, SEEK_DATA).
        .target(name: "CLinux"),
        // The server's side of /dev/fuse (libfuse's custom io): INIT recorded and replayed, resend.
        .target(name: "CFuseChannel"),
        // Holds the /dev/fuse descriptor, starts and restarts the server (SPEC 11). C, libc only.
        .executableTarget(name: "mirrorfs-keeper"),
        // The block-job engine: devices, filter, job state. No FUSE, no sockets.
        .target(
            name: "MirrorCore",
            dependencies: ["CLinux", .product(name: "SystemPackage", package: "swift-system")]
        ),
        // The kernel boundary: fuse_lowlevel_ops → MirrorCore calls → replies.
        .target(
            name: "MirrorFUSE",
            dependencies: ["CFuse", "CFuseChannel", "CLinux", "MirrorCore", .product(name: "SystemPackage", package: "swift-system")]
        ),
        // libnbd, the NBD protocol's client library; shim.h adapts its macros for Swift.
        .systemLibrary(
            name: "CNBD",
            path: "Sources/CNBD",
            pkgConfig: "libnbd",
            providers: [.apt(["libnbd-dev"])]
        ),
        // NBD exports as block devices: one I/O thread per connection, deadlines, reconnects.
        .target(
            name: "MirrorNBD",
            dependencies: ["CNBD", "MirrorCore", .product(name: "SystemPackage", package: "swift-system")]
        ),
        // One job-setup path for the CLI and QMP: target checks, creation, image locks, the dirty log.
        .target(
            name: "MirrorSetup",
            dependencies: ["CLinux", "MirrorCore", "MirrorNBD"]
        ),
        // QEMU's Machine Protocol on a unix socket: framing, command table → job verbs.
        .target(
            name: "MirrorQMP",
            dependencies: ["MirrorCore", "MirrorNBD", "MirrorSetup", .product(name: "SystemPackage", package: "swift-system")]
        ),
        .executableTarget(
            name: "mirrorfs",
            dependencies: [
                "CLinux", "MirrorCore", "MirrorFUSE", "MirrorNBD", "MirrorQMP", "MirrorSetup",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            plugins: ["BuildInfo"]
        ),
        // The version (VERSION) and the commit, generated into the executable at build time.
        .plugin(name: "BuildInfo", capability: .buildTool()),
        .testTarget(
            name: "MirrorQMPTests",
            dependencies: ["MirrorQMP", "MirrorCore", "MirrorSetup"]
        ),
        .testTarget(
            name: "MirrorCoreTests",
            dependencies: ["MirrorCore", .product(name: "SystemPackage", package: "swift-system")]
        ),
        // Real kernel mounts driven through the built `mirrorfs` binary and real clients.
        .testTarget(
            name: "MirrorFUSETests",
            dependencies: ["mirrorfs", "mirrorfs-keeper", "CLinux"]
        ),
    ]
)
