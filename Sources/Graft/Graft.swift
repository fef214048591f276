@_exported import GraftTensor
@_exported import GraftIO
@_exported import GraftText
@_exported import GraftModels
