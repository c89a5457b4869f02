package pgstore_test

import (
	"fmt"
	"os"
	"testing"

	"go.uber.org/goleak"

	"github.com/pgstore/pgstore/internal/pgtest"
)

// Every test and example of the package needs PostgreSQL: without one, the
// package is skipped with the reason (a failure under CI=true).
func TestMain(m *testing.M) {
	if _, err := pgtest.Find(); err != nil {
		fmt.Fprintln(os.Stderr, "pgstore tests:", err)
		if os.Getenv("CI") == "true" {
			os.Exit(1)
		}
		fmt.Println("skipped: no PostgreSQL")
		os.Exit(0)
	}
	// A test container's own goroutines (its reaper) started above.
	goleak.VerifyTestMain(m, goleak.IgnoreCurrent())
}
