package target

// GoodSnapshot gives the external tests (package target_test) the snapshot
// the internal ones start from.
var GoodSnapshot = goodSnapshot
