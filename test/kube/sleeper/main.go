// Command sleeper is test/kube's sandbox ("pause") image and its smallest
// workload: it prints one line naming where it runs, then sleeps until
// SIGTERM or SIGINT. With the argument -api it also resolves the API
// server's Service name through cluster DNS and calls the API server the
// way in-cluster clients do (Service env, service account token and CA),
// printing both answers. With -write=PATH it writes "node=<NODE_NAME>" to
// PATH (making its parent dirs), and with -ls=DIR it prints DIR's entries,
// for tests of hostPath volumes without a shell in the image. Static, so
// an image of this one file runs anywhere.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

const saDir = "/var/run/secrets/kubernetes.io/serviceaccount"

func main() {
	host, _ := os.Hostname()
	fmt.Printf("sleeper: started on node %q (host %q) args %q\n", os.Getenv("NODE_NAME"), host, strings.Join(os.Args[1:], " "))
	if slices.Contains(os.Args[1:], "-api") {
		go func() {
			// Short names through the pod's search path, as apps use them.
			addrs, err := net.LookupHost("kubernetes.default")
			fmt.Printf("sleeper: DNS kubernetes.default = %v (err %v)\n", addrs, err)
			fmt.Println("sleeper: " + checkAPI())
		}()
	}
	for _, a := range os.Args[1:] {
		if p, ok := strings.CutPrefix(a, "-write="); ok {
			err := os.MkdirAll(filepath.Dir(p), 0o755)
			if err == nil {
				err = os.WriteFile(p, []byte("node="+os.Getenv("NODE_NAME")+"\n"), 0o644)
			}
			fmt.Printf("sleeper: write %s: err %v\n", p, err)
		}
		if d, ok := strings.CutPrefix(a, "-ls="); ok {
			var names []string
			entries, err := os.ReadDir(d)
			for _, e := range entries {
				names = append(names, e.Name())
			}
			fmt.Printf("sleeper: ls %s: %v (err %v)\n", d, names, err)
		}
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	s := <-sig
	fmt.Printf("sleeper: %v, exiting\n", s)
}

// checkAPI GETs /version from the API server as an in-cluster client,
// retrying for 20s, and describes the outcome in one line.
func checkAPI() string {
	url := "https://" + net.JoinHostPort(os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")) + "/version"
	token, err := os.ReadFile(saDir + "/token")
	if err != nil {
		return "API check: no service account token: " + err.Error()
	}
	ca, err := os.ReadFile(saDir + "/ca.crt")
	if err != nil {
		return "API check: no CA: " + err.Error()
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	client := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	var last error
	for range 20 {
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
		resp, err := client.Do(req)
		if err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return fmt.Sprintf("API server at %s answered %s: %s", url, resp.Status, strings.Join(strings.Fields(string(body)), " "))
			}
			err = fmt.Errorf("%s: %s", resp.Status, body)
		}
		last = err
		time.Sleep(time.Second)
	}
	return fmt.Sprintf("API check: %s failed: %v", url, last)
}
