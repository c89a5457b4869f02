package main

import (
	"testing"
	"time"

	"github.com/pgstore/pgstore/examples/centrifuge/internal/cftest"
)

// TestMain drops the schemas that failed tests left and checks for leaked
// goroutines. The leak check waits up to 5 s: a node whose last subscriber
// of a channel left unsubscribes from the broker a second later, in a
// goroutine of centrifuge's that Node.Shutdown does not wait for.
func TestMain(m *testing.M) {
	cftest.Main(m, 5*time.Second)
}
