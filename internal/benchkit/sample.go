package benchkit

import (
	"context"
	"fmt"
	"sync"
	"time"
)

// A Side is one side of a latency figure: it writes one key, one sample at
// a time, and hears each write. The sides of a figure take turns, sample by
// sample.
type Side struct {
	Name string
	// Heard gets the time each write was heard; see Hear. It must be
	// buffered (NewSide's holds one).
	Heard chan time.Time
	Write func(ctx context.Context, i int) error

	Event []time.Duration // from the write's start to hearing it
	Wrote []time.Duration // from the write's start to its return
	Lost  int             // samples not heard within Sample's timeout
}

// NewSide returns a side named name, with its Heard channel and no Write.
func NewSide(name string) *Side { return &Side{Name: name, Heard: make(chan time.Time, 1)} }

// Hear reports that the write was heard now. A hearing that no sample has
// taken yet (a late one of a lost sample) is kept, and this one dropped.
func (s *Side) Hear() {
	select {
	case s.Heard <- time.Now():
	default:
	}
}

// Sample writes sample i and waits until it is heard, for at most timeout,
// after which it counts as lost. It keeps the times (and the loss) only if
// keep: a warm-up sample's are thrown away.
func (s *Side) Sample(ctx context.Context, i int, keep bool, timeout time.Duration) error {
	// Drain what a late hearing of a lost sample left behind.
	select {
	case <-s.Heard:
	default:
	}
	start := time.Now()
	if err := s.Write(ctx, i); err != nil {
		return fmt.Errorf("%s: %w", s.Name, err)
	}
	wrote := time.Since(start)
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case at := <-s.Heard:
		if keep {
			s.Event = append(s.Event, at.Sub(start))
			s.Wrote = append(s.Wrote, wrote)
		}
	case <-timer.C:
		if keep {
			s.Lost++
		}
	case <-ctx.Done():
		return ctx.Err()
	}
	return nil
}

// CheckHeard ends a latency figure's sampling: it is an error if a side
// heard none of its n samples, and rep gets a note for each side that lost
// some. figure and what name them in the note ("latency", "publications").
func CheckHeard(rep *Report, figure, what string, n int, timeout time.Duration, sides ...*Side) error {
	for _, side := range sides {
		if len(side.Event) == 0 {
			return fmt.Errorf("%s: none of %d %s heard", side.Name, n, what)
		}
		if side.Lost > 0 {
			rep.Note("%s: %s lost %d of %d %s (not heard within %v)", figure, side.Name, side.Lost, n, what, timeout)
		}
	}
	return nil
}

// Concurrently calls f for 0..n-1 from g goroutines, goroutine w taking
// every g-th i from w, and returns the calls per second. The first error
// cancels the context of the others' calls and is the one returned.
func Concurrently(ctx context.Context, g, n int, f func(ctx context.Context, i int) error) (float64, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg    sync.WaitGroup
		once  sync.Once
		first error
	)
	start := time.Now()
	for w := range g {
		wg.Go(func() {
			for i := w; i < n; i += g {
				if err := f(ctx, i); err != nil {
					once.Do(func() {
						first = err
						cancel()
					})
					return
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if first != nil {
		return 0, first
	}
	return float64(n) / elapsed.Seconds(), nil
}
