// The umbrella module: `import Graft` brings in every layer of the engine.
import CGraftABI
@_exported import GraftAdapters
@_exported import GraftDistributed
@_exported import GraftIO
@_exported import GraftModels
@_exported import GraftRouting
@_exported import GraftTensor
@_exported import GraftText
@_exported import GraftTrain

/// Graft's version: GRAFT_VERSION_* of include/graft.h, read from the header.
public enum GraftVersion {
    /// Incremented on incompatible changes of the C ABI.
    public static let major = Int(GRAFT_VERSION_MAJOR)
    /// Incremented when features are added compatibly.
    public static let minor = Int(GRAFT_VERSION_MINOR)
    /// Incremented for fixes.
    public static let patch = Int(GRAFT_VERSION_PATCH)
    /// "major.minor.patch".
    public static var string: String { "\(major).\(minor).\(patch)" }
}
