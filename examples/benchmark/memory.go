package main

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime"
	"runtime/metrics"
	"strconv"
	"sync"
	"time"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/benchkit"
)

// heapMetric is runtime.MemStats.HeapAlloc, read without stopping the world.
const heapMetric = "/memory/classes/heap/objects:bytes"

// heapSampler records the largest heap seen, every 10 ms until stopped.
type heapSampler struct {
	peak uint64
	stop chan struct{}
	done sync.WaitGroup
}

func heapNow() uint64 {
	s := []metrics.Sample{{Name: heapMetric}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

func startHeapSampler() *heapSampler {
	h := &heapSampler{peak: heapNow(), stop: make(chan struct{})}
	h.done.Go(func() {
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-tick.C:
				h.peak = max(h.peak, heapNow())
			case <-h.stop:
				h.peak = max(h.peak, heapNow())
				return
			}
		}
	})
	return h
}

// Stop ends the sampling and returns the peak in bytes.
func (h *heapSampler) Stop() uint64 {
	close(h.stop)
	h.done.Wait()
	return h.peak
}

// memoryFigure measures figure 5: the peak heap while -mem-records records go
// through SetAsync with the default buffer limit. The caller keeps only the
// last Result and reuses one value buffer (SetAsync copies it), so what grows
// is pgstore's.
func memoryFigure(ctx context.Context, e *env) error {
	const figure, table = "memory", "mem"
	n := e.s.memRecords
	c, err := e.connectLabelled(ctx, figure, e.schema)
	if err != nil {
		return err
	}
	defer c.close()

	runtime.GC()
	baseline := heapNow()
	sampler := startHeapSampler()
	var rate float64
	err = labelled(ctx, figure, "pgstore", func(ctx context.Context) error {
		buf := make([]byte, 0, e.s.valueBytes)
		key := make([]byte, 0, 32)
		var last *pgstore.Result
		start := time.Now()
		for i := range n {
			if i%4096 == 0 && ctx.Err() != nil {
				return ctx.Err()
			}
			buf = benchkit.AppendValue(buf[:0], i, 1, e.s.valueBytes)
			key = strconv.AppendInt(append(key[:0], table+"/m"...), int64(i), 10)
			last = c.SetAsync(ctx, string(key), 1, json.RawMessage(buf))
		}
		if err := last.Wait(ctx); err != nil {
			return fmt.Errorf("pgstore: %w", err)
		}
		rate = float64(n) / time.Since(start).Seconds()
		return nil
	})
	peak := sampler.Stop()
	if err != nil {
		return err
	}
	// Every write before the last one is checked here, in the table, since
	// the caller kept none of their Results.
	var count int
	if err := e.raw.QueryRow(ctx, "SELECT count(*) FROM "+ident(e.schema, table)).Scan(&count); err != nil {
		return err
	}
	if count != n {
		return fmt.Errorf("table %q holds %d records, want %d", table, count, n)
	}
	const mb = 1 << 20
	e.rep.Set("peak_heap_mb", float64(peak)/mb, heapTargetMB)
	progress("%s: peak heap %.1f MB (baseline %.1f MB), %.0f rec/s", figure, float64(peak)/mb, float64(baseline)/mb, rate)
	e.rep.Note("peak_heap_mb: largest HeapAlloc of the whole process (sampled every 10 ms) while %d records of %d bytes went through SetAsync "+
		"with the default buffer limit (%d MB), only the last Result kept; heap before the run %.1f MB, throughput %.0f rec/s. "+
		"The data itself is %.0f MB, so a raw/pgstore ratio would mean nothing: the raw column holds the %d MB target instead, "+
		"and ratio = target/peak, ≥ 1 meaning within target (MB = 2^20 bytes)",
		n, e.s.valueBytes, pgstore.DefaultBufferLimit/mb, float64(baseline)/mb, rate,
		float64(n)*float64(e.s.valueBytes)/mb, heapTargetMB)
	return nil
}
