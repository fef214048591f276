import Testing
@testable import GraftIO

@Test func moduleLinks() {}
