public enum GraftModelsPlaceholder {}
