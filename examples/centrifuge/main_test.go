package main

import (
	"fmt"
	"os"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	code := m.Run()
	// A test that failed before its cleanup ran may leave its schema.
	testSchemas.Range(func(k, _ any) bool {
		if err := dropSchema(serverURL, k.(string)); err != nil {
			fmt.Fprintf(os.Stderr, "drop schema %s: %v\n", k, err)
			code = 1
		}
		return true
	})
	if code == 0 {
		if err := findLeaks(5 * time.Second); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// findLeaks looks for goroutines left running for up to wait. A node whose
// last subscriber of a channel left unsubscribes from the broker a second
// later, in a goroutine of centrifuge's that Node.Shutdown does not wait for:
// longer than goleak's own retries, which end after about half a second.
func findLeaks(wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		err := goleak.Find()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}
