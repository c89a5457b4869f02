// Package cftest holds the test scaffolding that the centrifuge example's
// packages (the command and mapbroker) share: skipping where a test's tools
// are missing, and TestMain's leak check. Schemas and the server are the
// module root's (internal/pgtest).
package cftest

import (
	"fmt"
	"os"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// SkipOrFail skips the test for want of something it needs, or fails it
// under CI=true, where everything must be there.
func SkipOrFail(t testing.TB, msg string) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// Main is a TestMain: it runs the tests and, when everything passed, fails
// the run if goroutines are left running after leakWait (see FindLeaks). It
// does not return.
func Main(m *testing.M, leakWait time.Duration) {
	code := m.Run()
	if code == 0 {
		if err := FindLeaks(leakWait); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// FindLeaks looks for goroutines left running for up to wait, beyond
// goleak's own retries (which end after about half a second): a goroutine
// the code under test does not wait for may end later than that. A wait of
// zero is one goleak.Find.
func FindLeaks(wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		err := goleak.Find()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}
