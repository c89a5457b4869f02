package main

import (
	"bytes"
	"context"
	"log/slog"
	"testing"

	"github.com/pgstore/pgstore/internal/pgtest"
)

// The README's first command runs this program: keep it working, and
// quiet: a new user's first run logs no warning.
func TestQuickstartRuns(t *testing.T) {
	var logs bytes.Buffer
	defer slog.SetDefault(slog.Default())
	slog.SetDefault(slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if err := run(context.Background(), pgtest.URL(t)); err != nil {
		t.Fatal(err)
	}
	if logs.Len() > 0 {
		t.Errorf("the quickstart logged:\n%s", logs.String())
	}
}
