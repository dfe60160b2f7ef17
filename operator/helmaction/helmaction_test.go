package helmaction

import (
	"testing"

	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/release"
	"helm.sh/helm/v3/pkg/storage"
	"helm.sh/helm/v3/pkg/storage/driver"
)

func TestRecoverPending(t *testing.T) {
	for _, tc := range []struct {
		status release.Status
		want   release.Status
	}{
		{release.StatusPendingUpgrade, release.StatusFailed},
		{release.StatusPendingInstall, release.StatusFailed},
		{release.StatusPendingRollback, release.StatusFailed},
		{release.StatusDeployed, release.StatusDeployed},
		{release.StatusFailed, release.StatusFailed},
	} {
		cfg := &action.Configuration{Releases: storage.Init(driver.NewMemory()), Log: t.Logf}
		rel := &release.Release{Name: "spegel", Namespace: "fm", Version: 2, Info: &release.Info{Status: tc.status}}
		if err := cfg.Releases.Create(rel); err != nil {
			t.Fatal(err)
		}
		if err := RecoverPending(cfg, "spegel"); err != nil {
			t.Fatal(err)
		}
		got, err := cfg.Releases.Get("spegel", 2)
		if err != nil {
			t.Fatal(err)
		}
		if got.Info.Status != tc.want {
			t.Errorf("%s: became %s, want %s", tc.status, got.Info.Status, tc.want)
		}
	}
	cfg := &action.Configuration{Releases: storage.Init(driver.NewMemory()), Log: t.Logf}
	if err := RecoverPending(cfg, "none"); err != nil {
		t.Fatalf("no release: %v", err)
	}
}
