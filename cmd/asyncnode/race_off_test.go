//go:build !race

package main

// buildFlags builds the binary under test like the tests themselves: with
// the race detector when they run with it.
var buildFlags = []string(nil)
