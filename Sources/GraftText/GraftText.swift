public enum GraftTextPlaceholder {}
