package pgstore_test

import (
	"flag"
	"fmt"
	"os"
	"testing"

	"go.uber.org/goleak"

	"github.com/pgstore/pgstore/internal/pgtest"
)

// TestMain is the one of the whole test binary: the internal tests of package
// pgstore (fuzz_test.go) run under it too.
//
// Without PostgreSQL every test still runs: those that need the server skip
// themselves through pgtest.URL (failing under CI=true), the others pass or
// fail on their own. Examples cannot skip, and all of them but
// ExampleEventType_String print what a server answers, so without a server no
// example runs: TestMain leaves them out through -test.skip. Under CI=true a
// run without a server fails, even when every test it selected was pure.
func TestMain(m *testing.M) {
	flag.Parse()
	// First, so that goleak ignores a test container's own goroutines.
	_, err := pgtest.Find()
	if err != nil {
		fmt.Fprintln(os.Stderr, "pgstore tests:", err)
		fmt.Fprintln(os.Stderr, "pgstore tests: the tests that need PostgreSQL skip (fail under CI=true); the examples do not run")
		skipExamples()
	}
	goleak.VerifyTestMain(ciRun{m, err}, goleak.IgnoreCurrent())
}

// skipExamples adds the examples to -test.skip. The testing package splits
// the pattern at its top-level "|" into alternatives, so a user's own -skip,
// subtest levels and all, keeps its meaning beside ours.
func skipExamples() {
	pattern := "^Example"
	if prev := flag.Lookup("test.skip").Value.String(); prev != "" {
		pattern = prev + "|" + pattern
	}
	if err := flag.Set("test.skip", pattern); err != nil {
		panic(err)
	}
}

// ciRun fails a run under CI=true that found no server.
type ciRun struct {
	m       *testing.M
	findErr error
}

func (r ciRun) Run() int {
	code := r.m.Run()
	if r.findErr != nil && os.Getenv("CI") == "true" {
		fmt.Fprintln(os.Stderr, "pgstore tests: CI=true, and there is no PostgreSQL:", r.findErr)
		return 1
	}
	return code
}
