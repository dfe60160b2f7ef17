package kube

import (
	"encoding/json"
	"fmt"
	"testing"
)

// The CNI config is filled in with Sprintf: it must stay valid JSON with
// the run's network name and the node's range in place.
func TestCNIConfig(t *testing.T) {
	var conf struct {
		Name    string `json:"name"`
		Plugins []struct {
			Type string `json:"type"`
			IPAM struct {
				Ranges [][]struct {
					Subnet string `json:"subnet"`
				} `json:"ranges"`
				DataDir string `json:"dataDir"`
			} `json:"ipam"`
		} `json:"plugins"`
	}
	raw := fmt.Sprintf(cniConfig, "fm-abc123", "10.199.2.0/24", `/tmp/dir "quoted"/ipam`)
	if err := json.Unmarshal([]byte(raw), &conf); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, raw)
	}
	if conf.Name != "fm-abc123" || len(conf.Plugins) != 1 || conf.Plugins[0].Type != "bridge" ||
		conf.Plugins[0].IPAM.Ranges[0][0].Subnet != "10.199.2.0/24" || conf.Plugins[0].IPAM.DataDir != `/tmp/dir "quoted"/ipam` {
		t.Errorf("unexpected config: %+v", conf)
	}
}
