public enum GraftIOPlaceholder {}
