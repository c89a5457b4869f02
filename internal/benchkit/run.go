package benchkit

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"syscall"
	"time"
)

// DefaultURL is the database of a run without -url or $DATABASE_URL.
const DefaultURL = "postgres://postgres@127.0.0.1:5432/test"

// Flags is the command line the benchmarks share: -url and -quick, sizes
// whose defaults depend on -quick, and the checks of what was given.
type Flags struct {
	*flag.FlagSet
	urlP       *string
	quick      *bool
	sized      []sized
	positive   []*int
	valueBytes *int
}

type sized struct {
	p           *int
	full, quick int
}

// NewFlags defines -url (into url) and -quick (into quick, with the usage
// quickUsage) on a flag set named name that returns its errors.
func NewFlags(name string, url *string, quick *bool, quickUsage string) *Flags {
	f := &Flags{FlagSet: flag.NewFlagSet(name, flag.ContinueOnError), urlP: url, quick: quick}
	f.StringVar(url, "url", "", "PostgreSQL connection string (default: $DATABASE_URL, else "+DefaultURL+")")
	f.BoolVar(quick, "quick", false, quickUsage)
	return f
}

// Sized defines an int flag that, left 0, becomes full, or quick under
// -quick, and must end at least 1. The usage should tell both defaults.
func (f *Flags) Sized(p *int, name string, full, quick int, usage string) {
	f.IntVar(p, name, 0, usage)
	f.sized = append(f.sized, sized{p, full, quick})
	f.positive = append(f.positive, p)
}

// Positive defines an int flag that must be at least 1.
func (f *Flags) Positive(p *int, name string, value int, usage string) {
	f.IntVar(p, name, value, usage)
	f.positive = append(f.positive, p)
}

// ValueBytes defines -value-bytes, 200 unless given, at least 160 (see
// AppendValue).
func (f *Flags) ValueBytes(p *int, usage string) {
	f.IntVar(p, "value-bytes", 200, usage)
	f.valueBytes = p
}

// Parse parses args, which must hold flags only, defaults -url to
// $DATABASE_URL, else DefaultURL, fills in the sizes left 0 and checks them.
func (f *Flags) Parse(args []string) error {
	if err := f.FlagSet.Parse(args); err != nil {
		return err
	}
	if f.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %q", f.Args())
	}
	*f.urlP = cmp.Or(*f.urlP, os.Getenv("DATABASE_URL"), DefaultURL)
	for _, s := range f.sized {
		if *s.p == 0 {
			*s.p = s.full
			if *f.quick {
				*s.p = s.quick
			}
		}
	}
	for _, p := range f.positive {
		if *p < 1 {
			return errors.New("sizes, -goroutines and -rounds must be at least 1")
		}
	}
	if f.valueBytes != nil && *f.valueBytes < 160 {
		return errors.New("-value-bytes must be at least 160")
	}
	return nil
}

// Main is a benchmark command's body, its exit code the result: it parses
// args with parse (0 on -help, 2 on a bad command line), then calls run
// with a context that the first interrupt or SIGTERM cancels (a second one
// kills at once), 1 if run fails. Errors go to stderr after name and a
// colon.
func Main[S any](name string, args []string, parse func([]string) (S, error), run func(context.Context, S) error) int {
	s, err := parse(args)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, name+":", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		stop() // a second Ctrl-C kills at once
	}()
	if err := run(ctx, s); err != nil {
		fmt.Fprintln(os.Stderr, name+":", err)
		return 1
	}
	return 0
}

// Step is a part of a run, working on an environment of type E.
type Step[E any] struct {
	Name string
	Run  func(context.Context, E) error
}

// RunSteps runs the steps in order, reporting on progress how long each
// took and collecting garbage after each, so that one's does not weigh on
// the next. It stops at the first error, prefixed with the step's name
// (and "interrupted" if ctx ended).
func RunSteps[E any](ctx context.Context, e E, steps []Step[E], progress func(format string, args ...any)) error {
	for _, s := range steps {
		start := time.Now()
		if err := s.Run(ctx, e); err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("%s: interrupted: %w", s.Name, err)
			}
			return fmt.Errorf("%s: %w", s.Name, err)
		}
		progress("%s: done in %v", s.Name, time.Since(start).Round(time.Millisecond))
		runtime.GC()
	}
	return nil
}
