package pgtest

import (
	"net"
	"net/url"
	"sync"
	"testing"
)

// A Proxy forwards TCP connections to the test server, and can cut them all
// and refuse new ones, as a restarting server or a broken network would, or
// hold the bytes of the connections open now while new ones pass, as a
// partition that strands one socket does.
type Proxy struct {
	target string
	ln     net.Listener
	mu     sync.Mutex
	down   bool
	thaw   chan struct{} // while frozen: closed by Restore
	conns  map[net.Conn]struct{}
	links  []*link
	wg     sync.WaitGroup
}

// A link is one client connection and its server connection.
type link struct {
	holdRequests, holdReplies chan struct{} // while held: closed by Release
	held                      bool          // ever held
	ended                     sync.WaitGroup
}

// NewProxy starts a proxy to the test server on a loopback port and returns
// it with a connection string that goes through it. It stops when the test
// ends.
func NewProxy(t testing.TB) (*Proxy, string) {
	t.Helper()
	u, err := url.Parse(URL(t))
	if err != nil {
		t.Fatalf("proxy: test URL is not a URL: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{target: u.Host, ln: ln, conns: make(map[net.Conn]struct{})}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	u.Host = ln.Addr().String()
	return p, u.String()
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return // closed
		}
		server, err := net.Dial("tcp", p.target) // not under the lock: Cut must not wait for it
		if err != nil {
			client.Close()
			continue
		}
		p.mu.Lock()
		if p.down {
			p.mu.Unlock()
			client.Close()
			server.Close()
			continue
		}
		p.conns[client] = struct{}{}
		p.conns[server] = struct{}{}
		l := &link{}
		l.ended.Add(2)
		p.links = append(p.links, l)
		p.wg.Add(2)
		go p.pipe(client, server, l, false)
		go p.pipe(server, client, l, true)
		p.mu.Unlock()
	}
}

func (p *Proxy) pipe(dst, src net.Conn, l *link, toServer bool) {
	defer p.wg.Done()
	defer l.ended.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			thaw, held := p.thaw, l.holdReplies
			if toServer {
				held = l.holdRequests
			}
			p.mu.Unlock()
			if thaw != nil {
				<-thaw // frozen: hold the bytes, as a lost network would
			}
			if held != nil {
				<-held // and what follows stays in the socket, in order
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				break
			}
		}
		if err != nil {
			break // closed or cut
		}
	}
	dst.Close()
	src.Close()
	p.mu.Lock()
	delete(p.conns, dst)
	delete(p.conns, src)
	p.mu.Unlock()
}

// Cut closes every connection through the proxy and refuses new ones until
// Restore.
func (p *Proxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = true
	for c := range p.conns {
		c.Close()
	}
}

// Restore accepts connections again, and ends a Freeze.
func (p *Proxy) Restore() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = false
	if p.thaw != nil {
		close(p.thaw)
		p.thaw = nil
	}
}

// Freeze stops forwarding bytes without closing anything, until Restore:
// the connections hang, as over a network that silently lost the server.
func (p *Proxy) Freeze() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.thaw == nil {
		p.thaw = make(chan struct{})
	}
}

// HoldRequests holds what the connections open now send to the server,
// until Release; new connections pass. A client that gives up and closes
// its socket still has what it sent delivered on Release, as a kernel
// delivers an orphaned socket's data late.
func (p *Proxy) HoldRequests() { p.hold(true) }

// HoldReplies holds what the server sends to the connections open now,
// until Release; new connections pass. The server runs what it is sent,
// and its answers are lost to a client that gives up.
func (p *Proxy) HoldReplies() { p.hold(false) }

func (p *Proxy) hold(requests bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, l := range p.links {
		l.held = true
		if requests && l.holdRequests == nil {
			l.holdRequests = make(chan struct{})
		} else if !requests && l.holdReplies == nil {
			l.holdReplies = make(chan struct{})
		}
	}
}

// Release delivers what HoldRequests and HoldReplies held.
func (p *Proxy) Release() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, l := range p.links {
		for _, ch := range []*chan struct{}{&l.holdRequests, &l.holdReplies} {
			if *ch != nil {
				close(*ch)
				*ch = nil
			}
		}
	}
}

// Settle waits until every connection that was ever held has ended: after
// Release, once its client has gone, whatever it held has been delivered.
func (p *Proxy) Settle() {
	p.mu.Lock()
	var held []*link
	for _, l := range p.links {
		if l.held {
			held = append(held, l)
		}
	}
	p.mu.Unlock()
	for _, l := range held {
		l.ended.Wait()
	}
}

// Refuse refuses new connections until Restore, leaving open ones as they
// are.
func (p *Proxy) Refuse() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = true
}

func (p *Proxy) close() {
	p.Release()
	p.ln.Close()
	p.Restore()
	p.Cut()
	p.wg.Wait()
}
