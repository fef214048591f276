import Testing
@testable import GraftModels

@Test func moduleLinks() {}
