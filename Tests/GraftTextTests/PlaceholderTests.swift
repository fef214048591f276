import Testing
@testable import GraftText

@Test func moduleLinks() {}
