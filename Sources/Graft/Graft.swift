// The umbrella module: `import Graft` brings in every layer of the engine.
@_exported import GraftAdapters
@_exported import GraftIO
@_exported import GraftModels
@_exported import GraftRouting
@_exported import GraftTensor
@_exported import GraftText
@_exported import GraftTrain
