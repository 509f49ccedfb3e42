using System.Security.Cryptography.X509Certificates;
using Backup.Block.Objects;
using Backup.Block.Security;

namespace Backup.Block.Tests.Security;

public sealed class AuthzTests
{
    [Theory]
    [InlineData("CN=*", "CN=client", true)]
    [InlineData("*,CN=client.example.com", "C=GB,O=Org,CN=client.example.com", true)]
    [InlineData("*,CN=client.example.com", "C=GB,O=Org,CN=other.example.com", false)]
    [InlineData("a?c", "abc", true)]
    [InlineData("a?c", "ac", false)]
    [InlineData("[a-c]x", "bx", true)]
    [InlineData("[!a-c]x", "bx", false)]
    [InlineData("[!a-c]x", "dx", true)]
    [InlineData("a\\*", "a*", true)]
    [InlineData("a\\*", "ab", false)]
    [InlineData("*/b", "a/x/b", true)]
    [InlineData("[]]", "]", true)]
    [InlineData("[", "[", true)]
    [InlineData("", "", true)]
    [InlineData("*", "", true)]
    public void Globs_match_as_fnmatch_without_flags(string pattern, string text, bool expected) =>
        Glob.Matches(pattern, text).Should().Be(expected);

    [Fact]
    public void A_list_takes_the_first_matching_rule_then_its_policy()
    {
        var list = new AuthzList("a", AuthzPolicy.Deny,
        [
            new AuthzRule("*CN=eve*", AuthzPolicy.Deny, AuthzMatchFormat.Glob),
            new AuthzRule("O=Org,*", AuthzPolicy.Allow, AuthzMatchFormat.Glob),
            new AuthzRule("exact", AuthzPolicy.Allow),
        ]);
        list.IsAllowed("O=Org,CN=alice").Should().BeTrue();
        list.IsAllowed("O=Org,CN=eve").Should().BeFalse();
        list.IsAllowed("exact").Should().BeTrue();
        list.IsAllowed("exac*").Should().BeFalse();
        new AuthzList("b", AuthzPolicy.Allow, []).IsAllowed("anyone").Should().BeTrue();
    }

    [Fact]
    public void A_list_file_is_reread_when_it_changes_and_keeps_its_rules_when_the_new_file_is_bad()
    {
        var path = Path.GetTempFileName();
        try
        {
            File.WriteAllText(path, """{"policy": "deny", "rules": [{"match": "alice", "policy": "allow"}]}""");
            var authz = AuthzListFile.Load("f", path, refresh: true);
            authz.IsAllowed("alice").Should().BeTrue();
            authz.IsAllowed("bob").Should().BeFalse();

            File.WriteAllText(path, """{"policy": "allow", "rules": [{"match": "alice", "policy": "deny", "format": "exact"}]}""");
            File.SetLastWriteTimeUtc(path, DateTime.UtcNow.AddSeconds(5));
            authz.IsAllowed("alice").Should().BeFalse();
            authz.IsAllowed("bob").Should().BeTrue();

            File.WriteAllText(path, "{ not json");
            File.SetLastWriteTimeUtc(path, DateTime.UtcNow.AddSeconds(10));
            authz.IsAllowed("bob").Should().BeTrue();

            FluentActions.Invoking(() => AuthzListFile.Load("g", path + ".missing", refresh: false)).Should().Throw<BlockException>()
                .WithMessage($"Unable to read '{path}.missing': No such file or directory");
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Fact]
    public void An_authz_object_is_found_by_id_at_each_check()
    {
        var objects = new ObjectRegistry();
        objects.TryAdd("a", new AuthzSimple("a", "CN=x"));
        objects.TryAdd("s", new SecretObject("s", [1]));
        Authz.IsAllowedById(objects, "a", "CN=x").Should().BeTrue();
        Authz.IsAllowedById(objects, "a", "CN=y").Should().BeFalse();
        FluentActions.Invoking(() => Authz.IsAllowedById(objects, "s", "CN=x")).Should().Throw<BlockException>().WithMessage("Object 's' is not a QAuthZ subclass");
        objects.Remove("a");
        FluentActions.Invoking(() => Authz.IsAllowedById(objects, "a", "CN=x")).Should().Throw<BlockException>().WithMessage("Cannot find QAuthZ object ID a");
    }

    [Fact]
    public void Distinguished_names_keep_the_certificates_order_and_escape_as_RFC_4514()
    {
        // The builder encodes the attribute added last first.
        var builder = new X500DistinguishedNameBuilder();
        builder.AddCommonName(" client.example.com");
        builder.AddOrganizationName("Test, Org+1");
        builder.AddStateOrProvinceName("London");
        builder.AddCountryOrRegion("GB");
        DistinguishedName.Format(builder.Build()).Should().Be(@"C=GB,ST=London,O=Test\, Org\+1,CN=\ client.example.com");
    }
}
