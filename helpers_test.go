package pgstore_test

import (
	"context"
	"testing"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/pgtest"
)

// connect returns a connector on a schema of the test's own, closed when the
// test ends.
func connect(t testing.TB, opts ...pgstore.Option) *pgstore.Connector {
	t.Helper()
	schema := pgtest.Schema(t)
	return connectSchema(t, schema, opts...)
}

// connectSchema returns a connector on the given schema, closed when the test
// ends (before the schema is dropped).
func connectSchema(t testing.TB, schema string, opts ...pgstore.Option) *pgstore.Connector {
	t.Helper()
	opts = append([]pgstore.Option{pgstore.WithSchema(schema)}, opts...)
	c, err := pgstore.Connect(context.Background(), pgtest.URL(t), opts...)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(func() {
		if err := c.Close(context.Background()); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return c
}
