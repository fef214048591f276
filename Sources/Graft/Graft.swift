// The umbrella module: `import Graft` brings in every layer of the engine.
@_exported import GraftAdapters
@_exported import GraftIO
@_exported import GraftModels
@_exported import GraftRouting
@_exported import GraftTensor
@_exported import GraftText
@_exported import GraftTrain

/// Graft's version (keep in step with GRAFT_VERSION_* in include/graft.h; the C tests compare them).
public enum GraftVersion {
    /// Incremented on incompatible changes of the C ABI.
    public static let major = 0
    /// Incremented when features are added compatibly.
    public static let minor = 2
    /// Incremented for fixes.
    public static let patch = 0
    /// "major.minor.patch".
    public static var string: String { "\(major).\(minor).\(patch)" }
}
