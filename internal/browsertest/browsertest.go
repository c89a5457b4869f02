// Package browsertest holds what the examples' browser tests share: finding
// Chromium, driving a headless one with chromedp, collecting what goes wrong
// on the page, and keeping a screenshot. Each test keeps its own page, steps
// and assertions; only the machinery around them lives here, so that a fix to
// it (a Chromium flag, a new kind of page problem) reaches every example.
package browsertest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	cdplog "github.com/chromedp/cdproto/log"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
)

// Timeout bounds a whole browser session: a page that never gets where a
// step waits for fails the test instead of hanging it.
const Timeout = 2 * time.Minute

// Chromium returns the path of a Chromium (or Chrome) binary. Without one it
// skips the test, or fails it under CI=true, where the browser test must run.
// Call it before any other set-up so that a skip costs nothing.
func Chromium(t testing.TB) string {
	t.Helper()
	// Debian's package first: it is what CI installs.
	if _, err := os.Stat("/usr/bin/chromium"); err == nil {
		return "/usr/bin/chromium"
	}
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable"} {
		if path, err := exec.LookPath(name); err == nil {
			return path
		}
	}
	msg := "no Chromium for the browser test: /usr/bin/chromium is missing and none is on $PATH (on Debian: apt-get install -y chromium)"
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// A Browser is one headless Chromium tab of a test. Its methods fail the test
// on an error, so that a test reads as the steps it takes.
type Browser struct {
	// Ctx is the tab's chromedp context, for what the methods do not cover.
	Ctx context.Context
	t   testing.TB
}

// Start starts the Chromium at path, headless with a window of width×height
// pixels, and opens a tab bounded by Timeout. The browser is stopped when the
// test ends; its errors go to the test's log.
func Start(t testing.TB, path string, width, height int) *Browser {
	t.Helper()
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(),
		chromedp.ExecPath(path),
		chromedp.Flag("headless", true),
		// No sandbox: tests often run as root in a container, where
		// Chromium's sandbox refuses to start.
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		// Nothing but the page under test may use the network (see Watch).
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.NoFirstRun,
		chromedp.WindowSize(width, height))
	t.Cleanup(cancelAlloc)
	ctx, cancelBrowser := chromedp.NewContext(allocCtx, chromedp.WithErrorf(t.Logf))
	t.Cleanup(cancelBrowser)
	ctx, cancel := context.WithTimeout(ctx, Timeout)
	t.Cleanup(cancel)
	return &Browser{Ctx: ctx, t: t}
}

// Problems collects whatever goes wrong on a page, for Report.
type Problems struct {
	mu       sync.Mutex
	list     []string
	reported bool // by Report: what comes after is the page torn down
}

func (p *Problems) add(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.reported {
		p.list = append(p.list, fmt.Sprintf(format, args...))
	}
}

// Watch starts collecting what goes wrong on the page: exceptions, console
// errors and browser log errors (a Content-Security-Policy violation among
// them), and requests to any URL that starts with none of allowed — a page
// that is meant to be self-contained must not fetch anything from elsewhere.
// Call it before the first Navigate so that nothing is missed.
func (b *Browser) Watch(allowed ...string) *Problems {
	b.t.Helper()
	p := &Problems{}
	err := chromedp.Listen(b.Ctx, func(ev any) {
		switch ev := ev.(type) {
		case *runtime.EventExceptionThrown:
			p.add("exception: %s", ev.ExceptionDetails.Text)
		case *runtime.EventConsoleAPICalled:
			if ev.Type == runtime.ConsoleAPICalledTypeError {
				p.add("console.error")
			}
		case *cdplog.EventEntryAdded:
			if ev.Entry.Level == cdplog.EntryLevelError {
				p.add("log: %s %s", ev.Entry.Text, ev.Entry.URL)
			}
		case *network.EventRequestWillBeSent:
			u := ev.Request.URL
			for _, prefix := range allowed {
				if strings.HasPrefix(u, prefix) {
					return
				}
			}
			p.add("request to %s", u)
		}
	})
	if err != nil {
		b.t.Fatal(err)
	}
	// The log and network domains send their events only once enabled.
	if _, err := chromedp.Call(b.Ctx, cdplog.Enable, cdp.Empty{}); err != nil {
		b.t.Fatal(err)
	}
	if _, err := chromedp.Call(b.Ctx, network.Enable, network.EnableParams{}); err != nil {
		b.t.Fatal(err)
	}
	return p
}

// Report fails t with each problem collected so far. Call it at the end of
// the test, once the page has done everything it was meant to; it stops the
// collection, so later problems (the page torn down with the test) are not
// reported.
func (p *Problems) Report(t testing.TB) {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	p.reported = true
	for _, s := range p.list {
		t.Errorf("page: %s", s)
	}
}

// Do runs steps in order and fails the test, naming what, if one fails.
func (b *Browser) Do(what string, steps ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	if err := chromedp.Do(b.Ctx, steps...); err != nil {
		b.t.Fatalf("%s: %v", what, err)
	}
}

// Text returns the visible text of the first element that matches the CSS
// selector sel, waiting for it to be visible.
func (b *Browser) Text(sel string) string {
	b.t.Helper()
	s, err := chromedp.Run(b.Ctx, chromedp.Text(chromedp.CSS(sel)))
	if err != nil {
		b.t.Fatalf("text of %s: %v", sel, err)
	}
	return s
}

// Screenshot saves a full-page PNG screenshot as name in the test's temporary
// directory and logs where. The test's directory is removed when it ends, so
// if the environment variable dirEnv names a directory, the screenshot is
// also kept there: for a CI artifact or a look by hand.
func (b *Browser) Screenshot(name, dirEnv string) {
	b.t.Helper()
	png, err := chromedp.Run(b.Ctx, chromedp.FullScreenshot(100))
	if err != nil {
		b.t.Fatal(err)
	}
	shot := filepath.Join(b.t.TempDir(), name)
	if err := os.WriteFile(shot, png, 0o644); err != nil {
		b.t.Fatal(err)
	}
	b.t.Logf("screenshot of the page: %s", shot)
	if dir := os.Getenv(dirEnv); dir != "" {
		keep := filepath.Join(dir, name)
		if err := os.WriteFile(keep, png, 0o644); err != nil {
			b.t.Fatal(err)
		}
		b.t.Logf("screenshot kept as %s", keep)
	}
}
