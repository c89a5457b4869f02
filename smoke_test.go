package pgstore_test

import (
	"context"
	"testing"
)

func TestSmoke(t *testing.T) {
	ctx := context.Background()
	c := connect(t)
	if err := c.Set(ctx, "cars/bmw", 1, map[string]any{"a": 1}); err != nil {
		t.Fatal(err)
	}
	rec, err := c.Get(ctx, "cars/bmw")
	t.Log(rec.Version, string(rec.Value), err)
	if err := c.Delete(ctx, "cars/bmw"); err != nil {
		t.Fatal(err)
	}
	_, err = c.Get(ctx, "cars/bmw")
	t.Log(err)
}
