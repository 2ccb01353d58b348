// swift-tools-version:5.9
// Swift bindings for convoy. The C library comes from an installed convoy (`make install`):
// SwiftPM finds its header and library through pkg-config (convoy.pc), e.g.
//   PKG_CONFIG_PATH=/opt/convoy/lib/pkgconfig swift build
import PackageDescription

let package = Package(
    name: "Convoy",
    platforms: [.macOS(.v13)],
    products: [
        .library(name: "Convoy", targets: ["Convoy"]),
    ],
    targets: [
        // convoy.h as a Clang module (Sources/CConvoy/module.modulemap).
        .systemLibrary(name: "CConvoy", pkgConfig: "convoy"),
        .target(name: "Convoy", dependencies: ["CConvoy"]),
        .testTarget(name: "ConvoyTests", dependencies: ["Convoy"]),
    ]
)
