package main

import (
	"context"
	"fmt"
	"math"
	"sync/atomic"
	"time"

	"github.com/centrifugal/centrifuge"

	"github.com/pgstore/pgstore"
	"github.com/pgstore/pgstore/internal/benchkit"
)

// latencyWarmup samples are taken and thrown away before the measured ones.
const latencyWarmup = 20

// latencyTimeout is how long a sample waits for its delivery before it
// counts as lost.
const latencyTimeout = 5 * time.Second

// latencyFigures measures the time from a Publish call to the node's
// BrokerEventHandler: through the pgstore broker to its own node's handler
// and to another node's (a broker on a store of its own, on the same
// schema), and through the memory broker (which calls the handler before
// Publish returns); and, as the reference, from pgstore's Set to a
// subscription's handler on another connector, with the change log. The
// sides take turns, sample by sample.
func latencyFigures(ctx context.Context, e *env) error {
	const key = "k"
	a, err := e.openPgNode(ctx, "lat")
	if err != nil {
		return err
	}
	defer a.close()
	b, err := e.openPgNode(ctx, "lat_b")
	if err != nil {
		return err
	}
	defer b.close()
	mem, memHandler, err := openMemoryBroker("lat")
	if err != nil {
		return err
	}
	defer mem.Close(context.Background())
	data := func(i int) []byte { return benchkit.AppendValue(nil, i, 1, e.s.valueBytes) }
	publishSide := func(name string, broker centrifuge.MapBroker, ch string, h *handler) *benchkit.Side {
		h.side.Name = name
		h.side.Write = func(ctx context.Context, i int) error {
			d := data(i)
			w := string(d)
			h.want.Store(&w)
			_, err := broker.Publish(ctx, ch, key, centrifuge.MapPublishOptions{Data: d})
			return err
		}
		return h.side
	}
	own := publishSide("pgstore broker", a.broker, "lat", a.handler)
	other := publishSide("pgstore broker, other node", a.broker, "lat_b", b.handler)
	memory := publishSide("memory broker", mem, "lat", memHandler)
	set, stopSet, err := e.setSide(ctx)
	if err != nil {
		return err
	}
	defer stopSet()

	sides := []*benchkit.Side{own, other, memory, set}
	for i := -latencyWarmup; i < e.s.samples; i++ {
		for j := range sides {
			side := sides[(j+i+latencyWarmup)%len(sides)]
			if err := side.Sample(ctx, i+latencyWarmup, i >= 0, latencyTimeout); err != nil {
				return err
			}
		}
	}
	if err := benchkit.CheckHeard(e.rep, "latency", "publications", e.s.samples, latencyTimeout, sides...); err != nil {
		return err
	}
	own50, own99 := benchkit.Percentiles(own.Event)
	other50, other99 := benchkit.Percentiles(other.Event)
	mem50, mem99 := benchkit.Percentiles(memory.Event)
	set50, set99 := benchkit.Percentiles(set.Event)
	progress("latency: pgstore broker p50 %v p99 %v; other node p50 %v p99 %v; memory broker p50 %v p99 %v; pgstore Set→handler p50 %v p99 %v",
		own50, own99, other50, other99, mem50, mem99, set50, set99)
	bound50, bound99 := 2*benchkit.Micros(set50+mem50), 2*benchkit.Micros(set99+mem99)
	e.rep.Set("latency_p50", benchkit.Micros(own50), bound50)
	e.rep.Set("latency_p99", benchkit.Micros(own99), bound99)
	e.rep.Set("latency_other_node_p50", benchkit.Micros(other50), bound50)
	e.rep.Set("latency_other_node_p99", benchkit.Micros(other99), bound99)
	e.rep.Set("set_latency_p50", math.NaN(), benchkit.Micros(set50))
	e.rep.Set("set_latency_p99", math.NaN(), benchkit.Micros(set99))
	e.rep.Set("memory_latency_p50", math.NaN(), benchkit.Micros(mem50))
	e.rep.Set("memory_latency_p99", math.NaN(), benchkit.Micros(mem99))
	e.rep.Note("latency: %d publications of one key, one at a time, timed from the call of Publish to the BrokerEventHandler of the benchmark's "+
		"(registered on the broker directly, no centrifuge.Node running, no client): the pgstore broker's own node, another node "+
		"(a broker on a store and pool of its own, on the same schema), and centrifuge's memory map broker (which calls the handler inside Publish). "+
		"Ceiling = 2 × (pgstore's Set → a subscription's handler on another connector, change log on + the memory broker's latency), "+
		"the issue's bound; the sides take turns sample by sample", e.s.samples)
	return nil
}

// setSide updates one key with pgstore's Set on one connector and hears
// each version in a subscription on another, as examples/benchmark's
// change_log figure.
func (e *env) setSide(ctx context.Context) (*benchkit.Side, func(), error) {
	const table, id = "lat", "k"
	writer, err := e.connect(ctx, e.setSchema)
	if err != nil {
		return nil, nil, err
	}
	listener, err := e.connect(ctx, e.setSchema)
	if err != nil {
		writer.close()
		return nil, nil, err
	}
	stop := func() {
		writer.close()
		listener.close()
	}
	// Make the table first: its creation is not a sample.
	if err := writer.Set(ctx, table+"/"+id, 0, benchkit.AppendValue(nil, 0, 0, e.s.valueBytes)); err != nil {
		stop()
		return nil, nil, err
	}
	var want atomic.Int64
	side := benchkit.NewSide("pgstore Set")
	sub, err := listener.Subscribe(ctx, func(ev pgstore.Event) {
		if (ev.Type == pgstore.Insert || ev.Type == pgstore.Update) && ev.ID == id && ev.Version == want.Load() {
			side.Hear()
		}
	}, pgstore.ForTables(table))
	if err != nil {
		stop()
		return nil, nil, fmt.Errorf("subscribe: %w", err)
	}
	side.Write = func(ctx context.Context, i int) error {
		v := int64(i + 1)
		want.Store(v)
		return writer.Set(ctx, table+"/"+id, v, benchkit.AppendValue(nil, i, v, e.s.valueBytes))
	}
	return side, func() {
		sub.Close(context.Background())
		stop()
	}, nil
}
