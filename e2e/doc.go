// Package e2e holds the end-to-end tests that run the real binary in a lab
// of network namespaces.
package e2e
