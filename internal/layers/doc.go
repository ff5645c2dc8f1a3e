// Package layers holds only a test: the import rules of DESIGN.md's layout,
// checked against what the packages really import.
package layers
