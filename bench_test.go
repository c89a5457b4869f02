package pgstore_test

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/pgstore/pgstore"
)

// benchKeyCount is how many keys the benchmarks cycle through: the first
// pass inserts, the next ones update.
const benchKeyCount = 10_000

// benchValue is a record of about 200 bytes of JSON.
var benchValue = json.RawMessage(`{"owner":"user-0042","pos":{"x":12.5,"y":-3.25},"speed":42,"tags":["red","fast"],"note":"` +
	strings.Repeat("x", 100) + `"}`)

func benchKeys() []string {
	keys := make([]string, benchKeyCount)
	for i := range keys {
		keys[i] = fmt.Sprintf("bench/k%05d", i)
	}
	return keys
}

// BenchmarkSet writes one record at a time and waits until it is durable:
// about one flush round trip per write.
func BenchmarkSet(b *testing.B) {
	c := connect(b)
	ctx := b.Context()
	keys := benchKeys()
	i := 0
	for b.Loop() {
		if err := c.Set(ctx, keys[i%len(keys)], int64(i), benchValue); err != nil {
			b.Fatal(err)
		}
		i++
	}
	b.ReportMetric(float64(i)/b.Elapsed().Seconds(), "records/s")
}

// BenchmarkSetAsync writes records from one goroutine without waiting for
// each, as a realtime server persisting its changes does. Each iteration
// also waits for the write made a window of iterations earlier, so that it
// measures the steady state: what a record costs to accept and to flush.
func BenchmarkSetAsync(b *testing.B) {
	c := connect(b)
	ctx := b.Context()
	keys := benchKeys()
	// A window that allows full batches. It is filled before the timed
	// loop and drained after it, so the timed iterations flush as many
	// records as they write.
	window := make([]*pgstore.Result, 2*pgstore.DefaultMaxBatchSize)
	for i := range window {
		window[i] = c.SetAsync(ctx, keys[i%len(keys)], int64(i), benchValue)
	}
	wait := func(r *pgstore.Result) {
		if err := r.Wait(ctx); err != nil {
			b.Fatal(err)
		}
	}
	i := len(window)
	for b.Loop() {
		slot := &window[i%len(window)]
		wait(*slot)
		*slot = c.SetAsync(ctx, keys[i%len(keys)], int64(i), benchValue)
		i++
	}
	for _, r := range window {
		wait(r)
	}
	b.ReportMetric(float64(i-len(window))/b.Elapsed().Seconds(), "records/s")
}

// BenchmarkGet reads random records that are in the table, not in the
// buffer: one query round trip each.
func BenchmarkGet(b *testing.B) {
	c := connect(b)
	ctx := b.Context()
	keys := benchKeys()
	results := make([]*pgstore.Result, len(keys))
	for i, k := range keys {
		results[i] = c.SetAsync(ctx, k, 1, benchValue)
	}
	for _, r := range results {
		if err := r.Wait(ctx); err != nil {
			b.Fatal(err)
		}
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for b.Loop() {
		if _, err := c.Get(ctx, keys[rng.IntN(len(keys))]); err != nil {
			b.Fatal(err)
		}
	}
}
