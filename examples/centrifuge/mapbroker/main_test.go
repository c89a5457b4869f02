package mapbroker

import (
	"testing"

	"github.com/pgstore/pgstore/examples/centrifuge/internal/cftest"
)

// TestMain drops the schemas that failed tests left and checks for leaked
// goroutines, with goleak's own retries only: the broker waits for every
// goroutine it starts when it closes.
func TestMain(m *testing.M) {
	cftest.Main(m, 0)
}
