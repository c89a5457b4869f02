package main

import (
	"context"
	"testing"

	"github.com/pgstore/pgstore/internal/pgtest"
)

// The README's first command runs this program: keep it working.
func TestQuickstartRuns(t *testing.T) {
	if err := run(context.Background(), pgtest.URL(t)); err != nil {
		t.Fatal(err)
	}
}
